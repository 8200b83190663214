module github.com/aerogo/packet/benchmarks

go 1.26

require (
	github.com/aerogo/packet v0.0.0
	github.com/gorilla/websocket v1.5.3
	github.com/libp2p/go-msgio v0.3.0
)

require (
	github.com/libp2p/go-buffer-pool v0.0.2 // indirect
	github.com/multiformats/go-varint v0.0.6 // indirect
)

replace github.com/aerogo/packet => ../
