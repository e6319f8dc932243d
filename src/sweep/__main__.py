"""`python -m src.sweep CONFIG ...`: see src/sweep/__init__.py."""
from src.cli import run_cli
from src.sweep import main

run_cli(main)
