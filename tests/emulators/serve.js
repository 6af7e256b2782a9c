#!/usr/bin/env node
// Starts kinesalite bound to a single host (default 127.0.0.1).
//
// kinesalite's own cli.js calls server.listen(port) with no host, which binds every
// interface; the tests may only use 127.0.0.1, so this wrapper takes the same options as
// cli.js (--port, --createStreamMs, --deleteStreamMs, --updateStreamMs, --shardLimit,
// --path, --ssl) plus --host, and listens on that host only. With --path unset kinesalite
// keeps everything in memory (memdown), so the native leveldown addon is never loaded.
'use strict'

var argv = require('minimist')(process.argv.slice(2))
var kinesalite = require('kinesalite')

var host = argv.host || '127.0.0.1'
var port = argv.port == null ? 4567 : Number(argv.port)

var server = kinesalite(argv).listen(port, host, function() {
  var address = server.address(), protocol = argv.ssl ? 'https' : 'http'
  console.log('Listening at %s://%s:%s', protocol, address.address, address.port)
})

function shutdown() { process.exit(0) }
process.on('SIGINT', shutdown)
process.on('SIGTERM', shutdown)
