os.execute('touch pwned')
