"""Progress of a training run on stderr, through tqdm.

On a terminal: one redrawn bar with the step, the last loss, the last evaluation and
the baselines. Elsewhere (CI logs, files, pipes): no bar, one line per evaluation.
``enabled=False``: nothing at all."""

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total, *, stream=None, enabled=True):
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        self.ref = ""

    def start(self, step, baselines, n_layers):
        """Called once before the first step (``step``: where the run starts)."""
        if "gdpp_loss" in baselines:
            self.ref = f"GD-{n_layers} {baselines['gd_loss']:.4f}, GD++ {baselines['gdpp_loss']:.4f}"
        else:                                 # the lds task (reference.seq_training): GD and ridge
            self.ref = f"GD {baselines['gd_loss']:.4f}, ridge {baselines['lstsq_loss']:.4f}"
        if self.tty:
            self.bar = tqdm(total=self.total, initial=step, file=self.stream, unit="step", dynamic_ncols=True,
                            mininterval=0.25, leave=True)

    def step(self, step, loss):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.5f}", refresh=False)

    def evaluated(self, row):
        cos = row["model_cos_gd"] if "model_cos_gd" in row else row["pred_cos_gd"]
        text = f"eval {row['loss']:.5f}, cos(GD) {cos:.3f} ({self.ref})"
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)
        elif self.enabled:
            print(f"step {row['step']}/{self.total}: {text}", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
