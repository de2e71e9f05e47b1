"""``python -m runner``."""

from runner.main import main

main()
