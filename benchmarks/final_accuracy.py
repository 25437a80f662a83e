"""A bench table's final models scored over all test rows: `python benchmarks/final_accuracy.py results/X.json`.

A bench's average accuracy weighs every task alike; a run with all classes in one task (`--tasks
1`) scores its model over all test rows. This weighs each task's accuracy in the last row of the
accuracy matrix by its number of test rows (the tasks rebuilt from the data and the seed as the
driver builds them), so that the two are the same measure. Prints Markdown.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.benchmarks import benchmark_path
from pipeline.config import RunConfig
from pipeline.scenario import make_scenario


def main() -> None:
    bench = json.loads(open(sys.argv[1]).read())
    table = pq.read_table(benchmark_path(bench["benchmark"], Path(RunConfig().output_dir) / "data")).to_pandas()
    columns = {"label": table.label.to_numpy(), "domain": table.domain.astype(str).to_numpy()}
    test = table.split.to_numpy() == "test"
    by_method = {}
    for run in sorted(bench["runs"], key=lambda r: r["seed"]):
        scenario = make_scenario(bench["scenario"], columns["label"], columns["domain"], bench["num_tasks"],
                                 run["seed"])
        sizes = [np.isin(columns[column][test], values).sum()
                 for column, values in map(scenario.rows_of, scenario.tasks)]
        by_method.setdefault(run["method"], []).append(float(np.dot(run["acc_matrix"][-1], sizes) / sum(sizes)))
    print(f"| {bench['benchmark']} {bench['scenario']}, {bench['num_tasks']} tasks | final accuracy over all test "
          "rows | by seed |\n|---|---|---|")
    for method, values in by_method.items():
        print(f"| {method} | {np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f} | "
              f"{', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
