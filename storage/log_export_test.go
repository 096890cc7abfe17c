package storage

// Test hooks of the message log for the external tests.

// TrimNow applies retention at once, as the trimmer does every second.
func (l *Log) TrimNow() { l.trimNow() }

// LogKey is the key of the log record seq in a store written before
// blocks.
func LogKey(seq uint64) []byte { return logKey(seq) }

// LogBlockPrefix is the namespace of the log's blocks.
func LogBlockPrefix() []byte { return []byte(nsLogBlock) }

// LogBlockKey is the key of the block that starts at first.
func LogBlockKey(first uint64) []byte { return blockKey(first) }

// SetLegacyLogWrites has l write one key per record, as the log did
// before blocks (to test that such stores still open and read).
func SetLegacyLogWrites(l *Log, on bool) {
	l.appendMu.Lock()
	defer l.appendMu.Unlock()
	l.legacyWrites = on
	l.open = nil // the next append opens a block of the new kind
}

// LogBlockRefs is the number of block refs in l's index.
func LogBlockRefs(l *Log) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.blocks)
}

// CheckLogBlock is what verify checks of a block.
func CheckLogBlock(key, value []byte) error { return checkBlock(key, value) }
