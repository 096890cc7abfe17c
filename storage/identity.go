package storage

import (
	"strconv"
	"strings"
)

// Identity names a message in a whole cluster: the node that accepted
// it, the epoch of that node's log and its seq there (hex). It is what
// LogMessage.Origin holds for a message another node accepted.
func Identity(node string, epoch, seq uint64) string {
	return node + "/" + strconv.FormatUint(epoch, 16) + "/" + strconv.FormatUint(seq, 16)
}

// ParseIdentity splits what Identity joined.
func ParseIdentity(id string) (node string, epoch, seq uint64, ok bool) {
	j := strings.LastIndexByte(id, '/')
	if j < 0 {
		return "", 0, 0, false
	}
	i := strings.LastIndexByte(id[:j], '/')
	if i <= 0 {
		return "", 0, 0, false
	}
	epoch, err1 := strconv.ParseUint(id[i+1:j], 16, 64)
	seq, err2 := strconv.ParseUint(id[j+1:], 16, 64)
	if err1 != nil || err2 != nil {
		return "", 0, 0, false
	}
	return id[:i], epoch, seq, true
}
