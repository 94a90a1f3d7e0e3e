-- A shared recipe must not run commands: the sandbox refuses this.
os.execute("echo escaped")
