from flows.cli import run

run()
