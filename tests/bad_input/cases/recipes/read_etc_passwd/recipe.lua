io.open('/etc/passwd', 'r')
