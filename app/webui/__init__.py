"""Layer 9 (top): the web UI, a front end over the CLI's commands (`python -m app webui`). Its forms come
from the config tree, its checks are the CLI's pre-flight, and every action runs the `python -m app` command
it shows. Nothing imports this layer but app/__main__.py."""
