#!/usr/bin/env node
// Starts dynalite (DynamoDB emulator, kinesalite's sibling) bound to a single host (default 127.0.0.1).
//
// dynalite's own cli.js listens on `argv.port || 4567`, so `--port 0` (let the OS pick a free port) is not
// possible through it. This wrapper takes the same options as cli.js (--port, --createTableMs,
// --deleteTableMs, --updateTableMs, --maxItemSizeKb, --path, --ssl) plus --host, accepts --port 0, and prints
// the port it got in the same "Listening at" line as serve.js. With --path unset dynalite keeps everything
// in memory (memory-level).
'use strict'

var argv = require('minimist')(process.argv.slice(2))
var dynalite = require('dynalite')

var host = argv.host || '127.0.0.1'
var port = argv.port == null ? 4567 : Number(argv.port)

var server = dynalite(argv).listen(port, host, function() {
  var address = server.address(), protocol = argv.ssl ? 'https' : 'http'
  console.log('Listening at %s://%s:%s', protocol, address.address, address.port)
})

function shutdown() { process.exit(0) }
process.on('SIGINT', shutdown)
process.on('SIGTERM', shutdown)
