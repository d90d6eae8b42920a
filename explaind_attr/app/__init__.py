"""The application layer: the `explaind` command line (`cli.py`, every verb in one module,
with its input loaders in `loading.py`) and the end-to-end demo (`demo/`).

Library code never imports from here; `python -m explaind_kernel` and the `explaind`
console script both enter through `explaind_attr.app.cli.main`.
"""
