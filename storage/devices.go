package storage

const nsDevice = "d\x00"

// DeviceKey is the key of a device record.
func DeviceKey(id string) []byte { return append([]byte(nsDevice), id...) }

// PutDevice stores a device record (devices.Store).
func (d *DB) PutDevice(id string, data []byte) error {
	return d.Write(Set(DeviceKey(id), data))
}

// DeleteDevice removes a device record (devices.Store).
func (d *DB) DeleteDevice(id string) error {
	return d.Write(Delete(DeviceKey(id)))
}

// Devices calls fn with every device record (devices.Store).
func (d *DB) Devices(fn func(data []byte) error) error {
	return d.Scan([]byte(nsDevice), func(_, v []byte) error { return fn(v) })
}
