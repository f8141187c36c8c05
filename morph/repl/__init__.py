"""`morph repl`: a line-editor loop for quick steered drafting.

session.py holds the conversation (no terminal code), log.py its rows in morph.db,
commands.py the slash commands and their completer, app.py the prompt-toolkit loop.
"""
