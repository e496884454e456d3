"""Clients of the running loop: simulated users and their scripted preferences, the judgement of one version
against another by a preference, and the HTML report of the rounds."""
