io.open('/tmp/moontune-bad-input-escape.txt', 'w')
