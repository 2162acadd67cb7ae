"""Imported by the converter's forkserver only (`multiprocessing` preload; nothing else imports it).

The forkserver, not the converter, is the parent of the decode workers, and each worker holds the pipe
whose end-of-file would tell the forkserver that the converter is gone: a SIGKILLed converter used to
leave the forkserver and its workers waiting for each other. Here the forkserver asks to be killed
with the converter; the workers ask the same of the forkserver (`convert._init_worker`).
"""

from data_tools.convert import die_with_parent

die_with_parent()
