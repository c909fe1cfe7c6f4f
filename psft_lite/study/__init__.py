"""Many runs compared: the study runner, its report, and `psft-lite plot`."""
