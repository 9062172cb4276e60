"""memhier: where encoded KV-cache blocks live (device -> host -> disk); cache/ decides what to keep and how."""
