"""Task-agnostic evaluation and the continual-learning metrics of an accuracy matrix."""
import numpy as np
import torch

from pipeline.data import batch_to_arrays


@torch.no_grad()
def predict(model, columns: dict, modalities: dict[str, int], batch_size: int = 512, only: str | None = None) -> np.ndarray:
    """Head indices predicted for every row of `columns` (column -> numpy), all seen classes competing.

    `only`: the one modality the model may see (the others are masked as missing)."""
    model.eval()
    n, out = len(columns["label"]), []
    for lo in range(0, n, batch_size):
        batch = {k: v[lo:lo + batch_size] for k, v in columns.items()}
        feats, present, _ = batch_to_arrays(batch, modalities)
        if only is not None:
            present &= np.array([m == only for m in modalities])
        logits = model({m: torch.from_numpy(x) for m, x in feats.items()}, torch.from_numpy(present))["logits"]
        out.append(logits.argmax(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def summarize(matrix: list[list[float | None]]) -> dict:
    """Average accuracy (last row), average incremental accuracy, forgetting and backward transfer."""
    t = len(matrix)
    rows = [np.array([v for v in row[: i + 1]], dtype=float) for i, row in enumerate(matrix)]
    last = rows[-1]
    forgetting = [max(rows[i][j] for i in range(j, t - 1)) - last[j] for j in range(t - 1)]
    bwt = [last[j] - rows[j][j] for j in range(t - 1)]
    return {
        "avg_acc": float(last.mean()),
        "avg_inc_acc": float(np.mean([r.mean() for r in rows])),
        "forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
        "bwt": float(np.mean(bwt)) if bwt else 0.0,
    }


def format_matrix(matrix: list[list[float | None]]) -> str:
    t = len(matrix[0]) if matrix else 0
    lines = ["after \\ on " + " ".join(f"{f'T{j}':>6}" for j in range(t))]
    for i, row in enumerate(matrix):
        lines.append(f"{f'T{i}':>11} " + " ".join(f"{v:6.3f}" if v is not None else "     -" for v in row))
    return "\n".join(lines)


def accuracy_row(model, columns: dict, rows_per_task: list, upto: int, targets: np.ndarray, modalities,
                 only: str | None = None) -> list:
    """Accuracy on each task 0..upto's rows from one process (the workers' evaluation is checked
    against it), every seen class competing; None for later tasks."""
    row = [None] * len(rows_per_task)
    for j in range(upto + 1):
        rows = rows_per_task[j]
        pred = predict(model, {k: v[rows] for k, v in columns.items()}, modalities, only=only)
        row[j] = float((pred == targets[rows]).mean())
    return row
