"""Operations: how a running pipeline is seen and steered from outside. The control socket and its
one command table, ``procd status``'s view, the Prometheus endpoint, sd_notify, and the bounded
connections they are served over.

Runs in the supervisor process (``control``'s client side also in the CLI); never in a worker.
"""
