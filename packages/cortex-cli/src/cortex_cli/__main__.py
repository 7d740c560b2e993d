"""`python -m cortex_cli` is the `cortex` command."""

from cortex_cli.main import main

main(prog_name="cortex")
