"""The tiled job kinds as the API and the CLI see them: each kind's spec checked, its tiles
planned and recorded, its job described. Light on purpose (no kernel is imported here): the tiles
are computed by worker/tasks/<kind>.py, which declares the kind to worker/tiled.py."""
