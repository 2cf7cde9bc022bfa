// SFService without a database: the users live in this array and the READ handler answers
// CAP's query from it. A database would be @cap-js/sqlite, whose better-sqlite3 compiles
// from source on CI (two minutes of `npm ci`). CAP itself still parses the URL, applies
// cds.query.limit (package.json) to req.query, and writes @odata.nextLink from a full page,
// which the V2 adapter turns into an absolute __next: so a page here must be exactly the
// rows and offset CAP asked for.
const cds = require("@sap/cds");

const USERS = Array.from({ length: 250 }, (_, i) => ({
  userId: `u${String(i + 1).padStart(4, "0")}`,
  firstName: `First${i + 1}`,
  lastName: `Last${i + 1}`,
  email: `user${i + 1}@example.test`,
}));

const COMPARE = {
  "=": (a, b) => a === b,
  "!=": (a, b) => a !== b,
  "<": (a, b) => a < b,
  ">": (a, b) => a > b,
  "<=": (a, b) => a <= b,
  ">=": (a, b) => a >= b,
};

// What this handler does not implement is refused, never answered with the wrong rows.
class Unsupported extends Error {}

function operand(user, x) {
  if (x.ref?.length === 1 && x.ref[0] in user) return user[x.ref[0]];
  if ("val" in x) return x.val;
  throw new Unsupported(JSON.stringify(x));
}

// A CQN condition ($filter, or the key of User('u0042')): comparisons joined by and/or/not,
// in parentheses ({xpr}) or not; `and` binds tighter than `or`, as in OData.
function holds(user, xpr) {
  if (xpr.length === 0) return true;
  const split = (tokens, word) =>
    tokens.reduce((parts, t) => (t === word ? parts.push([]) : parts.at(-1).push(t), parts), [[]]);
  return split(xpr, "or").some((conjunction) =>
    split(conjunction, "and").every((term) => {
      if (term[0] === "not") return !holds(user, term.slice(1));
      if (term.length === 1 && term[0].xpr) return holds(user, term[0].xpr);
      const [left, op, right] = term;
      if (term.length !== 3 || !(op in COMPARE)) throw new Unsupported(JSON.stringify(term));
      return COMPARE[op](operand(user, left), operand(user, right));
    }),
  );
}

function byOrder(orderBy) {
  return (a, b) => {
    for (const o of orderBy) {
      const [x, y] = [operand(a, o), operand(b, o)];
      if (x !== y) return (x < y ? -1 : 1) * (o.sort === "desc" ? -1 : 1);
    }
    return 0;
  };
}

function project(user, columns) {
  if (!columns || columns.some((c) => c === "*" || c.ref?.[0] === "*")) return { ...user };
  return Object.fromEntries(columns.map((c) => [c.as ?? c.ref[0], operand(user, c)]));
}

function read(SELECT) {
  const { from, where, orderBy, limit, columns, count, one } = SELECT;
  for (const unsupported of ["search", "groupBy", "having", "expand"]) {
    if (SELECT[unsupported]) throw new Unsupported(unsupported);
  }
  if (from.ref?.length !== 1) throw new Unsupported(JSON.stringify(from));
  let rows = USERS.filter((u) => holds(u, from.ref[0].where ?? []) && holds(u, where ?? []));
  if (orderBy) rows = [...rows].sort(byOrder(orderBy));
  if (columns?.length === 1 && columns[0].func === "count") {
    return [{ [columns[0].as]: rows.length }]; // /User/$count
  }
  const total = rows.length;
  const number = (x) => x?.val ?? x; // CQN has {val: 100} or 100
  const offset = number(limit?.offset) ?? 0;
  rows = rows.slice(offset, limit?.rows ? offset + number(limit.rows) : undefined);
  rows = rows.map((u) => project(u, columns));
  if (one) return rows[0];
  if (count) rows.$count = total; // $count=true, V2's $inlinecount=allpages
  return rows;
}

module.exports = class SFService extends cds.ApplicationService {
  init() {
    this.on("READ", "User", (req) => {
      try {
        return read(req.query.SELECT);
      } catch (e) {
        if (!(e instanceof Unsupported)) throw e;
        return req.reject(501, `tests/interop/cap/srv/service.js does not implement ${e.message}`);
      }
    });
    return super.init();
  }
};
