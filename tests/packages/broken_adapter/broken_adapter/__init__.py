raise RuntimeError("this adapter is broken on purpose")
