"""`ft ui`: the web dashboard and REST API, a second face on the services beside the CLI."""
