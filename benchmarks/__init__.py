"""The benchmark document (``nox -s bench``): every figure beside its baseline, measured in one run."""
