"""Starting processes for the supervisor: workers (fork, spawn, the fork server), the pipeline's
own virtual environment, and the child that checks a reload's stage code.

Runs in the supervisor (or, for the fork server, in the small server process it starts); what a
new worker runs after fork lives in ``procd.worker``.
"""
