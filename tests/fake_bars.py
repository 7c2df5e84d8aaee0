"""A stand-in for the CLI's rich progress bars, which show only on a terminal (never under CliRunner)."""


class Bars:
    """Stands in for the CLI's rich progress bars (shown only on a terminal): records each bar's tasks and
    updates."""

    def __init__(self):
        self.made = []

    def __call__(self, *columns, **_):
        bar = _Bar()
        self.made.append(bar)
        return bar


class _Bar:
    def __init__(self):
        self.tasks, self.updates = [], []

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def add_task(self, description, **fields):
        self.tasks.append({"description": description, **fields})
        return len(self.tasks) - 1

    def update(self, task, **fields):
        self.updates.append(fields)
