io.open('../escaped.txt', 'w')
