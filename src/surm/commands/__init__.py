"""The commands behind ``surm``'s command line: finetune, compare, search, bench, demo.

They use the library (structures, peft, data, models, methods, settings) and never the command line; the command
line (:mod:`surm.cli`) turns flags into their arguments.
"""
