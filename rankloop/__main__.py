from rankloop.cli import app

app(prog_name="rankloop")
