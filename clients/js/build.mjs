// Writes dist/jssocket-client.js, the browser bundle: src/index.js wrapped for a classic
// <script> tag, its exports on `globalThis.jssocket`. Node built-ins only, no bundler:
// the source is one file without imports, so wrapping it is the whole build.
//
//   node build.mjs          write the bundle
//   node build.mjs --check  fail when the committed bundle is not what the source gives
//
// The bundle is committed so that the server embeds it (src/console.rs) with no build step.

import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const source = await readFile(path.join(here, 'src', 'index.js'), 'utf8');
const target = path.join(here, 'dist', 'jssocket-client.js');

const names = [];
const body = source.replace(/^export (const|function|class) (\w+)/gm, (_, kind, name) => {
  names.push(name);
  return `${kind} ${name}`;
});
if (/^\s*(export|import)\b/m.test(body)) {
  throw new Error('src/index.js has an import or export this build does not handle');
}
const indented = body.trimEnd().split('\n').map((line) => (line ? '  ' + line : line)).join('\n');
const bundle = `// jssocket-client browser bundle: generated from src/index.js by build.mjs; do not edit.
// <script src="jssocket-client.js"></script> defines globalThis.jssocket.
(function () {
  'use strict';

${indented}

  globalThis.jssocket = { ${names.join(', ')} };
})();
`;

if (process.argv.includes('--check')) {
  const committed = await readFile(target, 'utf8').catch(() => '');
  if (committed !== bundle) {
    console.error('dist/jssocket-client.js is stale: run `node clients/js/build.mjs` and commit it');
    process.exit(1);
  }
} else {
  await writeFile(target, bundle);
}
