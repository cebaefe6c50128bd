from docsrag.flows.cli import run

run()
