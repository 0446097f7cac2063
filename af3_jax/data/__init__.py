"""Data: the upstream manifest format (`manifest`) and conversations into model inputs (`processor`)."""
