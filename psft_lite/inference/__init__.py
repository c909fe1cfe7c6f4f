"""Running a model or a run without training it: loading, generation, answer scoring, lm-eval, DDT, Hinted Decoding."""
