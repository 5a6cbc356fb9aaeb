"""Files of SPEC §11: uploads stored in the database, OpenAI batch lines in and out, Anthropic views.

``store`` keeps uploaded bytes; ``lines`` parses and validates an OpenAI batch input file (pure);
``output`` renders OpenAI output/error lines and Anthropic result lines (pure); ``views`` serves
a batch's output and error files from its results; ``anthropic`` maps batches to and from
Anthropic's Message Batches shapes (pure).
"""
