"""Every table, chart and interval the commands print or save, in one place.

- `intervals`: the 95 % intervals (Wilson, Student t over seeds, Wald, paired difference);
- `comparison`: the rows and tables of `codi compare` and `codi demo` (`aggregate`, `comparison_table`,
  `speedup_table`);
- `tables`: the tables of `codi eval`, `codi ablate` and `codi probe`, and `write_results`;
- `charts`: the comparison's and the ablation's PNG charts;
- `probe`: the probe's plots and its self-contained HTML page (`write_report`).
"""

from .charts import ablation_chart, comparison_chart
from .comparison import Row, RunRecord, aggregate, comparison_table, set_speedups, speedup_table
from .intervals import binomial_half_width, paired_drop, t_interval, t_quantile_975, wilson_interval
from .probe import write_report
from .tables import ablation_table, eval_table, probe_table, write_results

__all__ = [
    "RunRecord",
    "Row",
    "ablation_chart",
    "ablation_table",
    "aggregate",
    "binomial_half_width",
    "comparison_chart",
    "comparison_table",
    "eval_table",
    "paired_drop",
    "probe_table",
    "set_speedups",
    "speedup_table",
    "t_interval",
    "t_quantile_975",
    "wilson_interval",
    "write_report",
    "write_results",
]
