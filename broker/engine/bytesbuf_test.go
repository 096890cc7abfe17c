package engine

import "bytes"

type bytesBuffer struct{ bytes.Buffer }
