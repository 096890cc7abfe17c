package storage

// Test hooks of the message log for the external tests.

// TrimNow applies retention at once, as the trimmer does every second.
func (l *Log) TrimNow() { l.trimNow() }

// LogKey is the key of the log record seq.
func LogKey(seq uint64) []byte { return logKey(seq) }
