"""Task sequences: class-incremental (a seeded class order in chunks) or domain-incremental."""
from dataclasses import dataclass

import numpy as np


@dataclass
class Task:
    index: int
    classes: list  # labels whose rows belong to this task (class-IL) or every label (domain-IL)
    domains: list | None  # domains of this task (domain-IL), None for class-IL


@dataclass
class Scenario:
    kind: str
    class_order: list  # head index -> label; class-IL grows along it, domain-IL has it all from task 0
    tasks: list[Task]

    def head_size_after(self, task_index: int) -> int:
        if self.kind == "domain-il":
            return len(self.class_order)
        return sum(len(t.classes) for t in self.tasks[: task_index + 1])

    def rows_of(self, task: Task, so_far: bool = False) -> tuple[str, list]:
        """(column, values) selecting a task's rows; `so_far`: every task's up to this one."""
        tasks = self.tasks[:task.index + 1] if so_far else [task]
        if self.kind == "domain-il":
            return "domain", [d for t in tasks for d in t.domains]
        return "label", [c for t in tasks for c in t.classes]


DEFAULT_CLASS_IL_TASKS = 5


def default_tasks(kind: str, labels: np.ndarray, domains: np.ndarray) -> int:
    """`num_tasks: 0`: one task per domain (domain-IL), else five, or one per class when fewer."""
    if kind == "domain-il":
        return len(np.unique(domains))
    return min(DEFAULT_CLASS_IL_TASKS, len(np.unique(labels)))


def make_scenario(kind: str, labels: np.ndarray, domains: np.ndarray, num_tasks: int, seed: int) -> Scenario:
    """Raises ValueError when the data cannot make `num_tasks` tasks."""
    rng = np.random.default_rng(seed)
    classes = sorted(np.unique(labels).tolist())
    if kind == "class-il":
        if num_tasks > len(classes):
            raise ValueError(f"class-il: {num_tasks} tasks but only {len(classes)} classes")
        order = [classes[i] for i in rng.permutation(len(classes))]
        chunks = np.array_split(np.arange(len(order)), num_tasks)
        tasks = [Task(i, [order[j] for j in c], None) for i, c in enumerate(chunks)]
        return Scenario(kind, order, tasks)
    if kind == "domain-il":
        doms = sorted(np.unique(domains).tolist())
        if len(doms) < 2:
            raise ValueError(f"domain-il: the data has one domain ({doms[0]!r}); domain-il needs two or more")
        if num_tasks > len(doms):
            raise ValueError(f"domain-il: {num_tasks} tasks but only {len(doms)} domains ({doms})")
        order = [doms[i] for i in rng.permutation(len(doms))]
        chunks = np.array_split(np.arange(len(order)), num_tasks)
        return Scenario(kind, classes, [Task(i, classes, [order[j] for j in c]) for i, c in enumerate(chunks)])
    raise ValueError(f"unknown scenario '{kind}' (class-il or domain-il)")
