from rankloop.cli import app

# Guarded: vLLM's engine processes start by importing the main module again (`rankloop eval` runs one).
if __name__ == "__main__":
    app(prog_name="rankloop")
