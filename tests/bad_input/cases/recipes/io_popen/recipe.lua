io.popen('ls')
