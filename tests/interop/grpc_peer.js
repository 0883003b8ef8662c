// Node @grpc/grpc-js (pure JavaScript) as a client of dlb in the conformance tests.
//
// Reads {"target": "HOST:PORT", "cases": [...]} as JSON on stdin, makes each call with raw bytes
// (no generated code: the test encodes and decodes the protobuf) and prints one JSON object per
// case on stdout, in the same shapes as grpc_peer.py's client (see there).
'use strict';

const fs = require('fs');
const grpc = require('@grpc/grpc-js');

const UNLIMITED = {
  'grpc.max_send_message_length': -1,
  'grpc.max_receive_message_length': -1,
};
const GZIP = 2; // grpc-js's CompressionAlgorithms.gzip

const codeName = (code) =>
  Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);

function metadataOut(metadata) {
  const out = [];
  if (!metadata) return out;
  for (const [key, values] of Object.entries(metadata.toJSON())) {
    for (const value of values) {
      out.push([key, key.endsWith('-bin') ? Buffer.from(value).toString('hex') : String(value)]);
    }
  }
  return out;
}

function metadataIn(pairs) {
  const metadata = new grpc.Metadata();
  for (const [key, value] of pairs || []) {
    metadata.add(key, key.endsWith('-bin') ? Buffer.from(value, 'hex') : value);
  }
  return metadata;
}

function call(clients, c) {
  return new Promise((resolve) => {
    const client = c.compression === 'gzip' ? clients.gzip : clients.plain;
    const options = {};
    if (c.timeout_ms !== undefined && c.timeout_ms !== null) {
      options.deadline = new Date(Date.now() + c.timeout_ms);
    }
    const result = { name: c.name, response: '', initial_metadata: [], trailing_metadata: [] };
    const identity = (x) => x;
    const pending = client.makeUnaryRequest(
      c.method, identity, identity, Buffer.from(c.request || '', 'hex'),
      metadataIn(c.metadata), options,
      (error, response) => {
        if (!error && response) result.response = Buffer.from(response).toString('hex');
      });
    pending.on('metadata', (metadata) => { result.initial_metadata = metadataOut(metadata); });
    pending.on('status', (status) => {
      result.code = codeName(status.code);
      result.message = status.details || '';
      result.trailing_metadata = metadataOut(status.metadata);
      // The callback runs before 'status' in grpc-js; answer on the next turn all the same.
      setImmediate(() => resolve(result));
    });
    if (c.cancel_after_ms !== undefined && c.cancel_after_ms !== null) {
      setTimeout(() => pending.cancel(), c.cancel_after_ms);
    }
  });
}

async function main() {
  const plan = JSON.parse(fs.readFileSync(0, 'utf8'));
  const insecure = grpc.credentials.createInsecure();
  const clients = {
    plain: new grpc.Client(plan.target, insecure, UNLIMITED),
    gzip: new grpc.Client(plan.target, insecure,
      { ...UNLIMITED, 'grpc.default_compression_algorithm': GZIP }),
  };
  for (const c of plan.cases) {
    process.stdout.write(JSON.stringify(await call(clients, c)) + '\n');
  }
  clients.plain.close();
  clients.gzip.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
