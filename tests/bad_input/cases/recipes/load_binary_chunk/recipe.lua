local f = load(string.dump(function() end))
