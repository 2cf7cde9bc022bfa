// An unchanged SAP Cloud SDK script: it pages through SuccessFactors' users by the
// upstream's own https:// __next links, printing "URL N" per page (N: the page's users).
//
//   node page-users.mjs env FIRST NAME   the destination NAME of the `destinations`
//                                        environment variable, its proxy from https_proxy;
//                                        FIRST's path asked of it
//   node page-users.mjs explicit FIRST   a destination object for FIRST's origin naming its
//                                        own proxyConfiguration, from SIDECAR_PROXY
//
// The SDK reads https_proxy only for destinations it looks up (the `destinations`
// variable, registerDestination, the destination service), never for an object passed
// in: that one goes straight to its URL unless it names its proxy itself.
//
// Trust is Node's own: NODE_EXTRA_CA_CERTS names `trust show`'s file. Nothing here
// relaxes TLS verification.
import { executeHttpRequest } from '@sap-cloud-sdk/http-client';
import { setGlobalLogLevel } from '@sap-cloud-sdk/util';

setGlobalLogLevel('error'); // its info lines go to stdout, where the pages go

const [mode, first, name] = process.argv.slice(2);
const origin = new URL(first).origin;
let destination;
if (mode === 'env') {
  destination = { destinationName: name };
} else if (mode === 'explicit') {
  const proxy = new URL(process.env.SIDECAR_PROXY);
  destination = {
    url: origin,
    proxyType: 'Internet',
    proxyConfiguration: {
      host: proxy.hostname,
      port: Number(proxy.port),
      protocol: proxy.protocol.replace(':', '')
    }
  };
} else {
  throw new Error(`unknown mode ${mode}: env or explicit`);
}

// env: the path alone, the destination gives the origin
let url = mode === 'env' ? first.slice(origin.length) : first;
try {
  while (url) {
    // __next as the upstream wrote it, absolute: axios takes it over the destination's URL
    const answer = await executeHttpRequest(destination, { method: 'get', url });
    const page = answer.data.d;
    console.log(new URL(url, origin).href, page.results.length);
    url = page.__next;
  }
} catch (error) {
  // one line on stderr, and out: unhandled, the SDK logs the stack on stdout and this
  // Node.js took 3 s more to exit
  const why = error.cause?.message;
  console.error(why && why !== error.message ? `${error.message}: ${why}` : error.message);
  process.exit(1);
}
