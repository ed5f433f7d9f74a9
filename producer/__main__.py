"""`python -m producer` is the `koala` command."""

from producer.cli import main

main()
