dofile('/etc/hostname')
