"""Stage code of the fan-out / fan-in example (pipelines/fanout.toml)."""


def events(count=2000):
    """Producer: a stream of log-like events, one in ten an error."""
    for n in range(count):
        yield {"n": n, "level": "error" if n % 10 == 0 else "info", "bytes": (n * 37) % 1500}


def sizes(event):
    """Transform (a generator): emits a size record only for large events."""
    if event["bytes"] >= 1000:
        yield {"kind": "large", "n": event["n"], "bytes": event["bytes"]}


class Summary:
    """Fan-in sink: receives both the grep'd errors and the large events."""

    def __init__(self):
        self.errors = 0
        self.large = 0

    def __call__(self, item):
        if isinstance(item, dict) and item.get("kind") == "large":
            self.large += 1
        else:
            self.errors += 1

    def close(self):
        print(f"summary: {self.errors} errors, {self.large} large events")
