# The two commands of the README. Each sets up .venv first (scripts/setup.sh).
.PHONY: demo test
.venv/.ready: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: .venv/.ready
	.venv/bin/segquant demo

test: .venv/.ready
	.venv/bin/python -m pytest -q -p no:cacheprovider
