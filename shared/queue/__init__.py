"""The queue contract between producers (API, scheduler) and consumers (workers).

``contract`` names the actors and builds their messages; ``broker`` builds a dramatiq Redis
broker with the queues declared; ``enqueue`` sends many messages in few round trips;
``inspect`` answers what is queued, held or lost. Consumer-side prefetch and priority logic
live in ``workers/broker.py``: producers never import the worker.
"""
