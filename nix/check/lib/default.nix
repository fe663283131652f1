# nix/check/lib/default.nix: this project's OWN stand-in for the part of nixpkgs' `lib`
# that nix/module.nix and its checks (nix/check/eval.nix, nix/check/nixos-stub.nix,
# tests.nix) use. It is not nixpkgs and contains no code taken from it: it was written
# for mk-upgrade from the module system's documented behaviour and is checked by
# tests.nix (run-tests.sh), whose expectations can also be run against nixpkgs' lib.
#
# What it covers
#   * evalModules: modules as paths, functions or attribute sets (shorthand or explicit
#     `config`/`options`), `imports`, `key`, `_file`, `disabledModules`, `freeformType`,
#     specialArgs, `_module.args`, `prefix`, extendModules; unknown definitions reported
#     with their full option path; the `config`, `options`, `lib` and `name` arguments.
#   * options: mkOption (default, apply, readOnly, type merging when declared in several
#     modules, options nested into a submodule option), mkEnableOption, mkPackageOption;
#     the option attributes value, isDefined, highestPrio, files, declarations, loc.
#   * properties: mkIf, mkMerge, mkOverride (mkDefault, mkForce, mkOptionDefault, ...),
#     mkOrder (mkBefore, mkAfter), pushed into attribute sets as nixpkgs does.
#   * types: the strings, numbers, paths, package, enum, either/oneOf/nullOr, listOf,
#     attrsOf, lazyAttrsOf, uniq/unique, functionTo, coercedTo, submodule(With),
#     deferredModule, optionType, anything, raw, unspecified; their checks, merges,
#     coercions, empty values and descriptions, with nixpkgs' error message wording.
#   * the general helpers (lists, strings, attribute sets, versions, shell escaping,
#     derivation outputs, generators.toPretty, kernel config values) the above use.
#
# What it deliberately does not do
#   option documentation (getSubOptions, visible/internal only stored), option aliases and
#   renames (mkAlias*, mkRenamedOptionModule, mkRemovedOptionModule, doRename),
#   mkDerivedConfig, "Did you mean ...?" suggestions, `_module.check`, `_module.freeformType`
#   as an option (freeformType is read from the modules themselves), `meta`, `_class`
#   checks, deprecated types and most of lib outside what is listed above.
#
# Known differences from nixpkgs
#   * types.package turns a context-free store path string into a derivation-like set
#     without builtins.storePath (no string context is added).
#   * getExe without meta.mainProgram uses the package name without a warning.
#   * a submodule's `name` is given to its modules as a special argument, not through
#     `_module.args.name`.
#   * definitions reach a type's merge in reverse module order (as in nixpkgs), modules
#     being collected depth-first with their imports after them.
{ ... }:

let
  inherit (builtins) all any attrNames concatLists concatMap concatStringsSep elem elemAt
    filter foldl' functionArgs genList head isAttrs isBool isFloat isFunction isInt isList
    isPath isString length listToAttrs mapAttrs match removeAttrs replaceStrings
    stringLength substring tail typeOf;

  # ===================================================================================
  # Small general helpers
  # ===================================================================================

  id = x: x;
  const = x: _: x;
  flip = f: a: c: f c a;
  min = a: c: if a < c then a else c;
  max = a: c: if a > c then a else c;
  boolToString = v: if v then "true" else "false";

  # ---- lists ------------------------------------------------------------------------

  toList = x: if isList x then x else [ x ];
  optional = ok: x: if ok then [ x ] else [ ];
  optionals = ok: xs: if ok then xs else [ ];
  imap0 = f: xs: genList (i: f i (elemAt xs i)) (length xs);
  imap1 = f: imap0 (i: f (i + 1));
  flatten = x: if isList x then concatMap flatten x else [ x ];
  reverseList =
    xs:
    let
      n = length xs;
    in
    genList (i: elemAt xs (n - 1 - i)) n;
  take = n: xs: genList (elemAt xs) (min n (length xs));
  drop =
    n: xs:
    let
      rest = length xs - n;
    in
    if rest <= 0 then [ ] else genList (i: elemAt xs (n + i)) rest;
  last =
    xs: if xs == [ ] then throw "lists.last: list must not be empty!" else elemAt xs (length xs - 1);
  init =
    xs: if xs == [ ] then throw "lists.init: list must not be empty!" else take (length xs - 1) xs;
  dedupe = foldl' (seen: x: if elem x seen then seen else seen ++ [ x ]) [ ];
  count = pred: foldl' (n: x: if pred x then n + 1 else n) 0;
  findFirst =
    pred: fallback: xs:
    let
      hits = filter pred xs;
    in
    if hits == [ ] then fallback else head hits;
  # right fold, written as a recursion over the indices
  foldr =
    op: start: xs:
    let
      n = length xs;
      from = i: if i == n then start else op (elemAt xs i) (from (i + 1));
    in
    from 0;
  range = lo: hi: if hi < lo then [ ] else genList (i: lo + i) (hi - lo + 1);
  subtractLists = unwanted: filter (x: !elem x unwanted);
  intersectLists = wanted: filter (x: elem x wanted);
  mutuallyExclusive = xs: ys: !any (x: elem x ys) xs;
  # Natural order: every run of digits is left-padded to 20 places before comparing.
  naturalSort =
    let
      pad = d: concatStrings (genList (_: "0") (20 - stringLength d)) + d;
      sortKey = s: concatStrings (map (p: if isList p then pad (head p) else p) (builtins.split "([0-9]+)" s));
    in
    xs:
    map (e: e.str) (
      builtins.sort (x: y: x.k < y.k) (
        map (s: {
          str = s;
          k = sortKey s;
        }) xs
      )
    );

  # ---- strings ----------------------------------------------------------------------

  concatStrings = concatStringsSep "";
  concatMapStrings = f: xs: concatStrings (map f xs);
  concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
  concatLines = concatMapStrings (l: l + "\n");
  optionalString = ok: s: if ok then s else "";
  hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
  hasSuffix =
    suf: s:
    let
      gap = stringLength s - stringLength suf;
    in
    gap >= 0 && substring gap (stringLength suf) s == suf;
  hasInfix =
    needle: s:
    let
      w = stringLength needle;
    in
    any (i: substring i w s == needle) (range 0 (stringLength s - w));
  removePrefix =
    pre: s: if hasPrefix pre s then substring (stringLength pre) (stringLength s) s else s;
  removeSuffix =
    suf: s: if hasSuffix suf s then substring 0 (stringLength s - stringLength suf) s else s;
  lowerCase = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  upperCase = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  toUpper = replaceStrings lowerCase upperCase;
  toLower = replaceStrings upperCase lowerCase;
  escape = specials: replaceStrings specials (map (c: "\\" + c) specials);
  regexSpecials = [ "\\" "[" "]" "{" "}" "(" ")" "^" "$" "?" "*" "+" "|" "." ];
  splitString = sep: s: filter isString (builtins.split (escape regexSpecials sep) s);
  trimSpace =
    s:
    let
      inner = match "[[:space:]]*(.*[^[:space:]])[[:space:]]*" s;
    in
    if inner == null then "" else head inner;
  toInt =
    s:
    let
      t = trimSpace s;
    in
    if match "-?0[0-9]+" t != null then
      throw "toInt: Ambiguity in interpretation of \"${s}\" between octal and zero padded integer."
    else if match "-?(0|[1-9][0-9]*)" t != null then
      builtins.fromJSON t
    else
      throw "toInt: Could not convert \"${s}\" to int.";
  # A string as a Nix string literal.
  quoteNix =
    s:
    "\""
    + replaceStrings [ "\\" "\"" "\${" "\n" "\r" "\t" ] [ "\\\\" "\\\"" "\\\${" "\\n" "\\r" "\\t" ] s
    + "\"";
  isIdentifier = s: match "[a-zA-Z_][a-zA-Z0-9_'-]*" s != null;
  escapeShellArg =
    arg:
    let
      s = toString arg;
    in
    if match "[a-zA-Z0-9,._+:@%/-]+" s != null then s else "'" + replaceStrings [ "'" ] [ "'\\''" ] s + "'";
  escapeShellArgs = concatMapStringsSep " " escapeShellArg;

  versionAtLeast = v: w: builtins.compareVersions v w >= 0;
  versionOlder = v: w: builtins.compareVersions v w < 0;
  versions = {
    major = v: elemAt (builtins.splitVersion v) 0;
    minor = v: elemAt (builtins.splitVersion v) 1;
    majorMinor = v: concatStringsSep "." (take 2 (builtins.splitVersion v));
  };

  # ---- attribute sets ---------------------------------------------------------------

  nameValuePair = name: value: { inherit name value; };
  mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
  mapAttrs' = f: set: listToAttrs (mapAttrsToList f set);
  filterAttrs = keep: set: removeAttrs set (filter (n: !keep n set.${n}) (attrNames set));
  genAttrs = names: f: listToAttrs (map (n: nameValuePair n (f n)) names);
  optionalAttrs = ok: set: if ok then set else { };
  attrByPath =
    path: fallback: set:
    if path == [ ] then
      set
    else if isAttrs set && set ? ${head path} then
      attrByPath (tail path) fallback set.${head path}
    else
      fallback;
  hasAttrByPath =
    path: set:
    path == [ ] || (isAttrs set && set ? ${head path} && hasAttrByPath (tail path) set.${head path});
  getAttrFromPath =
    path: attrByPath path (throw "cannot find attribute '${concatStringsSep "." path}'");
  setAttrByPath = path: v: foldr (n: inner: { ${n} = inner; }) v path;
  recursiveUpdate =
    lhs: rhs:
    lhs
    // mapAttrs (
      n: r: if isAttrs r && lhs ? ${n} && isAttrs lhs.${n} then recursiveUpdate lhs.${n} r else r
    ) rhs;

  # ---- values, derivations, paths ---------------------------------------------------

  throwIf = bad: msg: v: if bad then throw msg else v;
  throwIfNot = ok: throwIf (!ok);
  assertMsg = ok: msg: ok || throw msg;
  warn = msg: builtins.trace "warning: ${msg}";

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";
  isStringLike = v: isString v || isPath v || (isAttrs v && (v ? outPath || v ? __toString));
  storePrefix = builtins.storeDir + "/";
  isStorePath =
    v:
    isStringLike v
    && (
      let
        s = toString v;
      in
      hasPrefix "/" s && dirOf s == builtins.storeDir
    );
  # a store path string as the set types.package hands out
  asDerivation =
    p:
    let
      s = toString p;
      drv = {
        type = "derivation";
        name = substring 33 (stringLength s) (baseNameOf s);
        outPath = s;
        outputs = [ "out" ];
        out = drv;
        outputName = "out";
      };
    in
    drv;
  getOutput =
    out: pkg:
    if isAttrs pkg && !(pkg.outputSpecified or false) then pkg.${out} or pkg.out or pkg else pkg;
  getName = pkg: pkg.pname or (builtins.parseDrvName (pkg.name or pkg)).name;
  getExe' =
    pkg: program:
    if isDerivation pkg then
      "${getOutput "bin" pkg}/bin/${program}"
    else
      throw "lib.meta.getExe': The first argument is of type ${typeOf pkg}, but it should be a derivation instead.";
  getExe = pkg: getExe' pkg (pkg.meta.mainProgram or (getName pkg));
  makeSearchPath =
    sub: dirs: concatMapStringsSep ":" (d: "${d}/${sub}") (filter (d: d != null && d != "") dirs);
  makeSearchPathOutput = out: sub: pkgs: makeSearchPath sub (map (getOutput out) pkgs);
  makeBinPath = makeSearchPathOutput "bin" "bin";

  # Values of structured kernel configuration (nixpkgs' lib.kernel).
  kernel =
    let
      choice = t: {
        tristate = t;
        optional = false;
      };
    in
    {
      yes = choice "y";
      no = choice "n";
      module = choice "m";
      unset = choice null;
      option = v: v // { optional = true; };
      freeform = v: {
        freeform = v;
        optional = false;
      };
    };

  # ===================================================================================
  # Printing values and option paths (the text of error messages)
  # ===================================================================================

  toPretty =
    {
      multiline ? true,
      allowPrettyValues ? false,
      indent ? "",
    }:
    let
      multiLineString =
        ind: s:
        let
          rows = filter isString (builtins.split "\n" s);
          guard = replaceStrings [ "''" "\${" ] [ "'''" "''\${" ];
        in
        "''" + concatMapStrings (r: "\n" + ind + "  " + guard r) rows + "''";
      showFunction =
        f:
        let
          formals = functionArgs f;
        in
        if formals == { } then
          "<function>"
        else
          "<function, args: {${
            concatStringsSep ", " (mapAttrsToList (n: hasDefault: n + optionalString hasDefault "?") formals)
          }}>";
      render =
        ind: v:
        let
          deeper = ind + "  ";
          open = if multiline then "\n" + deeper else " ";
          close = if multiline then "\n" + ind else " ";
        in
        if isInt v then
          toString v
        else if isFloat v then
          builtins.toJSON v
        else if isBool v then
          boolToString v
        else if v == null then
          "null"
        else if isPath v then
          toString v
        else if isString v then
          (if multiline && hasInfix "\n" v then multiLineString ind v else quoteNix v)
        else if isFunction v then
          showFunction v
        else if isList v then
          (if v == [ ] then "[ ]" else "[" + concatMapStrings (x: open + render deeper x) v + close + "]")
        else if allowPrettyValues && v ? __pretty && v ? val then
          v.__pretty v.val
        else if isDerivation v then
          "<derivation ${toString (v.name or "")}>"
        else if v == { } then
          "{ }"
        else
          "{"
          + concatMapStrings (
            n: open + (if isIdentifier n then n else quoteNix n) + " = " + render deeper v.${n} + ";"
          ) (attrNames v)
          + close
          + "}";
    in
    render indent;

  generators = { inherit toPretty; };

  # `services."foo.bar".<name>`: parts that are not plain identifiers are quoted.
  showOption = concatMapStringsSep "." (
    part: if isIdentifier part || part == "*" || match "<[^>]*>" part != null then part else quoteNix part
  );
  showFiles = files: concatMapStringsSep " and " (f: "`${toString f}'") (dedupe files);

  # "\n- In `FILE': VALUE" for each definition, a value of several lines indented below.
  showDefs = concatMapStrings (
    d:
    let
      attempt = builtins.tryEval (toPretty { } d.value);
      text = if attempt.success then attempt.value else "<the value could not be evaluated>";
      rows = filter isString (builtins.split "\n" text);
    in
    "\n- In `${toString d.file}'"
    + (if length rows > 1 then ":" + concatMapStrings (r: "\n    " + r) rows else ": " + text)
  );

  priorityHint = "Use `lib.mkForce value` or `lib.mkDefault value` to change the priority on any of these definitions.";

  # ===================================================================================
  # Properties of definitions
  # ===================================================================================
  #
  # A definition value may be wrapped: { _type = "if"; condition; content; },
  # { _type = "merge"; contents; }, { _type = "override"; priority; content; },
  # { _type = "order"; priority; content; }. Plain definitions have override priority 100
  # and order priority 1000; the lowest override priority present wins.

  mkIf = cond: body: {
    _type = "if";
    condition = cond;
    content = body;
  };
  mkMerge = parts: {
    _type = "merge";
    contents = parts;
  };
  mkOverride = prio: body: {
    _type = "override";
    priority = prio;
    content = body;
  };
  mkOrder = prio: body: {
    _type = "order";
    priority = prio;
    content = body;
  };
  plainPriority = 100;
  plainOrder = 1000;
  mkOptionDefault = mkOverride 1500;
  mkDefault = mkOverride 1000;
  mkImageMediaOverride = mkOverride 60;
  mkForce = mkOverride 50;
  mkVMOverride = mkOverride 10;
  mkBefore = mkOrder 500;
  mkAfter = mkOrder 1500;

  wrapperOf = v: if isAttrs v then v._type or null else null;

  # mkMerge flattened, mkIf decided; other wrappers are left in place.
  expandProps =
    v:
    let
      w = wrapperOf v;
    in
    if w == "merge" then
      concatMap expandProps v.contents
    else if w == "if" then
      (
        if !isBool v.condition then
          throw "‘mkIf’ called with a non-Boolean condition"
        else if v.condition then
          expandProps v.content
        else
          [ ]
      )
    else
      [ v ];

  # The override priority of an expanded value (its content is not evaluated).
  overridePriority =
    v:
    let
      w = wrapperOf v;
    in
    if w == "override" then
      v.priority
    else if w == "order" then
      overridePriority v.content
    else
      plainPriority;

  # A value that won on priority, unwrapped: [ { value; order; } ... ].
  unwrapProps =
    ord: v:
    let
      w = wrapperOf v;
    in
    if w == "override" then
      unwrapProps ord v.content
    else if w == "order" then
      unwrapProps v.priority v.content
    else if w == "if" || w == "merge" then
      concatMap (unwrapProps ord) (expandProps v)
    else
      [
        {
          value = v;
          order = ord;
        }
      ];

  # At a level of the option tree, a definition must be an attribute set; properties
  # around it are moved onto each of its attributes, so that the attribute names are
  # known without deciding any mkIf.
  spreadProps =
    loc: file: v:
    let
      w = wrapperOf v;
      onEach = wrap: map (mapAttrs (_: wrap)) (spreadProps loc file v.content);
    in
    if w == "merge" then
      concatMap (spreadProps loc file) v.contents
    else if w == "if" then
      onEach (mkIf v.condition)
    else if w == "override" then
      onEach (mkOverride v.priority)
    else if w == "order" then
      onEach (mkOrder v.priority)
    else if isAttrs v then
      [ v ]
    else
      throw ''
        In module `${toString file}', you're trying to define a value of type `${typeOf v}'
        rather than an attribute set for the option
        `${showOption loc}'!

        `${showOption loc}' only groups other options: define those, e.g. `${showOption loc}.NAME = ...;'.'';

  # From the raw definitions of one value (list of { file; value; }) to its final value:
  # properties resolved, the winning priority kept, mkOrder applied, values checked
  # against the type, merged by it. Without definitions: the type's empty value, if any.
  resolveDefs =
    loc: type: raw:
    let
      expanded = concatMap (
        d:
        map (v: { inherit (d) file; value = v; }) (expandProps d.value)
      ) raw;
      top = foldl' (p: d: min p (overridePriority d.value)) 9999 expanded;
      winners = filter (d: overridePriority d.value == top) expanded;
      unwrapped = concatMap (d: map (u: u // { inherit (d) file; }) (unwrapProps plainOrder d.value)) winners;
      final = map (u: { inherit (u) file value; }) (builtins.sort (x: y: x.order < y.order) unwrapped);
      wrong = filter (d: !type.check d.value) final;
    in
    {
      defs = final;
      defined = final != [ ];
      highestPrio = top;
      value =
        if wrong != [ ] then
          throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition values:${showDefs wrong}"
        else if final != [ ] then
          type.merge loc final
        else if type ? emptyValue.value then
          type.emptyValue.value
        else
          throw "The option `${showOption loc}' was accessed but has no value defined. Try setting the option.";
    };

  # ---- merge functions shared by several types ---------------------------------------

  mergeEqualOption =
    loc: defs:
    let
      first = (head defs).value;
    in
    if all (d: d.value == first) (tail defs) then
      first
    else
      throw "The option `${showOption loc}' has conflicting definition values:${showDefs defs}\n${priorityHint}";

  uniqueOrFail =
    note: loc: defs:
    if length defs == 1 then
      (head defs).value
    else
      throw "The option `${showOption loc}' is defined multiple times while it's expected to be unique.\n${note}\nDefinition values:${showDefs defs}\n${priorityHint}";
  mergeOneOption = uniqueOrFail "";

  # types.unspecified: whatever the values have in common.
  mergeDefaultOption =
    loc: defs:
    let
      vals = map (d: d.value) defs;
      every = pred: all pred vals;
    in
    if length vals == 1 then
      head vals
    else if every isFunction then
      arg: mergeDefaultOption loc (map (d: d // { value = d.value arg; }) defs)
    else if every isList then
      concatLists vals
    else if every isAttrs then
      foldl' (acc: v: acc // v) { } vals
    else if every isBool then
      any id vals
    else if every isString then
      concatStrings vals
    else if every isInt && every (v: v == head vals) then
      head vals
    else
      throw "Cannot merge definitions of `${showOption loc}'. Definition values:${showDefs defs}";

  # ===================================================================================
  # Option types
  # ===================================================================================
  #
  # A type is { _type = "option-type"; name; description; descriptionClass; check;
  # merge loc defs; emptyValue? = { value; }; subModules; withSubModules; combine; ... }.
  # subModules: the modules a submodule-like type is built from (null: none), and
  # withSubModules the same type over other modules (options nested into the option).
  # combine other: this type merged with the same option's type from another
  # declaration, or null when they cannot be merged.

  mkOptionType =
    spec:
    let
      t = {
        _type = "option-type";
        description = spec.name;
        descriptionClass = null;
        check = _: true;
        merge = mergeDefaultOption;
        kind = spec.name;
        params = null;
        subModules = null;
        withSubModules = _: t;
        combine = other: if (other.kind or null) == t.kind && (other.params or null) == t.params then t else null;
      }
      // spec;
    in
    t;
  isOptionType = v: isAttrs v && (v._type or null) == "option-type";

  # "(x)" unless the description's class reads well unparenthesised in this position
  phrase = classes: t: if elem (t.descriptionClass or null) classes then t.description else "(${t.description})";

  # A type with no parameters other than `params`, compared by kind and params.
  simple =
    name: description: check: merge: extra:
    mkOptionType (
      {
        inherit name description check merge;
        descriptionClass = "noun";
      }
      // extra
    );

  # A type over one element type: combinable with the same wrapper over a combinable
  # element, passing nested submodules through to the element.
  wrapper =
    rebuild: elemType: spec:
    mkOptionType (
      {
        elem = elemType;
        descriptionClass = "composite";
        subModules = elemType.subModules;
        withSubModules = mods: rebuild (elemType.withSubModules mods);
        combine =
          other:
          if (other.kind or null) == spec.name then
            (
              let
                joined = elemType.combine other.elem;
              in
              if joined == null then null else rebuild joined
            )
          else
            null;
      }
      // spec
    );

  intBetween =
    name: description: lo: hi: extra:
    simple name description (x: isInt x && (lo == null || x >= lo) && (hi == null || x <= hi)) mergeEqualOption (
      { params = [ lo hi ]; } // extra
    );
  bounds = lo: hi: "${toString lo} and ${toString hi} (both inclusive)";
  sized =
    signed: bits:
    let
      span = builtins.foldl' (p: _: p * 2) 1 (range 1 bits);
      lo = if signed then 0 - span / 2 else 0;
      hi = if signed then span / 2 - 1 else span - 1;
      word = if signed then "signed" else "unsigned";
    in
    intBetween "${word}Int${toString bits}" "${toString bits} bit ${word} integer; between ${bounds lo hi}" lo hi { };

  separatedString =
    sep:
    simple "separatedString" "strings concatenated with ${builtins.toJSON sep}" isString (
      _: defs: concatMapStringsSep sep (d: d.value) defs
    ) { params = sep; };

  pathLike =
    inStore: x:
    isStringLike x
    && (
      let
        s = toString x;
      in
      if inStore then hasPrefix storePrefix s && stringLength s > stringLength storePrefix else hasPrefix "/" s
    );

  isModuleLike = x: isAttrs x || isFunction x || pathLike false x;

  types = rec {
    inherit mkOptionType isOptionType;
    isType = name: v: isAttrs v && (v._type or null) == name;

    # ---- strings ----
    str = simple "str" "string" isString mergeEqualOption { };
    nonEmptyStr = simple "nonEmptyStr" "non-empty string" (s: isString s && trimSpace s != "") mergeEqualOption { };
    singleLineStr = simple "singleLineStr" "(optionally newline-terminated) single-line string" (
      s: isString s && match "[^\n\r]*\n?" s != null
    ) (loc: defs: removeSuffix "\n" (mergeEqualOption loc defs)) { };
    strMatching =
      pattern:
      simple "strMatching" "string matching the pattern ${pattern}" (
        s: isString s && match pattern s != null
      ) mergeEqualOption { params = pattern; };
    inherit separatedString;
    lines = separatedString "\n";
    commas = separatedString ",";
    envVar = separatedString ":";
    passwdEntry =
      base:
      mkOptionType {
        name = "passwdEntry";
        description = "${base.description}, not containing newlines or colons";
        check = x: base.check x && match "[^\n:]*" x != null;
        inherit (base) merge;
        params = base.name;
      };

    # ---- booleans and numbers ----
    bool = simple "bool" "boolean" isBool mergeEqualOption { };
    boolByOr = simple "boolByOr" "boolean (merged using or)" isBool (_: defs: any (d: d.value) defs) { };
    int = simple "int" "signed integer" isInt mergeEqualOption { };
    ints = {
      between = lo: hi: intBetween "intBetween" "integer between ${bounds lo hi}" lo hi { };
      unsigned = intBetween "unsignedInt" "unsigned integer, meaning >=0" 0 null {
        descriptionClass = "nonRestrictiveClause";
      };
      positive = intBetween "positiveInt" "positive integer, meaning >0" 1 null {
        descriptionClass = "nonRestrictiveClause";
      };
      u8 = sized false 8;
      u16 = sized false 16;
      u32 = sized false 32;
      s8 = sized true 8;
      s16 = sized true 16;
      s32 = sized true 32;
    };
    port = ints.u16;
    float = simple "float" "floating point number" isFloat mergeEqualOption { };
    number = either int float;

    # ---- paths and packages ----
    path = simple "path" "absolute path" (pathLike false) mergeEqualOption { };
    pathInStore = simple "pathInStore" "path in the Nix store" (pathLike true) mergeEqualOption { };
    package = simple "package" "package" (x: isDerivation x || isStorePath x) (
      loc: defs:
      let
        v = mergeOneOption loc defs;
      in
      if isPath v || (isString v && !builtins.hasContext v) then asDerivation v else v
    ) { };

    # ---- catch-alls ----
    attrs = simple "attrs" "attribute set" isAttrs (_: defs: foldl' (acc: d: acc // d.value) { } defs) { };
    raw = simple "raw" "raw value" (_: true) mergeOneOption { };
    unspecified = simple "unspecified" "unspecified value" (_: true) mergeDefaultOption { };
    # Attribute sets merge attribute by attribute, functions by their results, anything
    # else must be equal in every definition; definitions of different kinds conflict.
    anything = simple "anything" "anything" (_: true) (
      loc: defs:
      let
        kindOf = v: if isAttrs v && isStringLike v then "stringish" else typeOf v;
        kinds = dedupe (map (d: kindOf d.value) defs);
      in
      if length kinds > 1 then
        throw "The option `${showOption loc}' has conflicting option types in ${showFiles (map (d: d.file) defs)}"
      else if head kinds == "set" then
        (attrsOf anything).merge loc defs
      else if head kinds == "lambda" then
        arg: (resolveDefs (loc ++ [ "<function body>" ]) anything (map (d: d // { value = d.value arg; }) defs)).value
      else
        mergeEqualOption loc defs
    ) { };

    # ---- choices ----
    enum =
      values:
      let
        show =
          v:
          if isString v then
            quoteNix v
          else if isInt v then
            toString v
          else if isBool v then
            boolToString v
          else
            "<${typeOf v}>";
      in
      mkOptionType {
        name = "enum";
        inherit values;
        description =
          if values == [ ] then
            "impossible (empty enum)"
          else if length values == 1 then
            "value ${show (head values)} (singular enum)"
          else
            "one of " + concatMapStringsSep ", " show values;
        descriptionClass = if length values > 1 then "conjunction" else "noun";
        check = v: elem v values;
        merge = mergeEqualOption;
        combine = other: if (other.kind or null) == "enum" then enum (dedupe (values ++ other.values)) else null;
      };

    either =
      left: right:
      mkOptionType {
        name = "either";
        inherit left right;
        description =
          if (left.descriptionClass or null) == "nonRestrictiveClause" then
            "${left.description}, or ${phrase [ "noun" "conjunction" ] right}"
          else
            "${phrase [ "noun" "conjunction" ] left} or ${phrase [ "noun" "conjunction" "composite" ] right}";
        descriptionClass = "conjunction";
        check = v: left.check v || right.check v;
        merge =
          loc: defs:
          if all (d: left.check d.value) defs then
            left.merge loc defs
          else if all (d: right.check d.value) defs then
            right.merge loc defs
          else
            mergeOneOption loc defs;
        combine =
          other:
          if (other.kind or null) != "either" then
            null
          else
            (
              let
                l = left.combine other.left;
                r = right.combine other.right;
              in
              if l == null || r == null then null else either l r
            );
      };
    oneOf =
      choices:
      if choices == [ ] then
        throw "types.oneOf needs at least one type"
      else if length choices == 1 then
        head choices
      else
        either (head choices) (oneOf (tail choices));

    nullOr =
      elemType:
      wrapper nullOr elemType {
        name = "nullOr";
        description = "null or ${phrase [ "noun" "conjunction" ] elemType}";
        descriptionClass = "conjunction";
        check = v: v == null || elemType.check v;
        emptyValue.value = null;
        merge =
          loc: defs:
          let
            nulls = count (d: d.value == null) defs;
          in
          if nulls == 0 then
            elemType.merge loc defs
          else if nulls == length defs then
            null
          else
            throw "The option `${showOption loc}` is defined both null and not null, in ${showFiles (map (d: d.file) defs)}.";
      };

    # ---- containers ----
    listOf =
      elemType:
      wrapper listOf elemType {
        name = "listOf";
        description = "list of ${phrase [ "noun" "composite" ] elemType}";
        check = isList;
        emptyValue.value = [ ];
        # element m of definition n is checked and merged on its own, at the option path
        # extended by "[definition n-entry m]"
        merge =
          loc: defs:
          concatLists (
            imap1 (
              n: d:
              let
                entries = imap1 (
                  m: v:
                  resolveDefs (loc ++ [ "[definition ${toString n}-entry ${toString m}]" ]) elemType [
                    { inherit (d) file; value = v; }
                  ]
                ) d.value;
              in
              map (e: e.value) (filter (e: e.defined) entries)
            ) defs
          );
      };
    nonEmptyListOf =
      elemType:
      let
        asList = listOf elemType;
      in
      wrapper nonEmptyListOf elemType {
        name = "nonEmptyListOf";
        description = "non-empty ${phrase [ "noun" ] asList}";
        check = v: isList v && v != [ ];
        inherit (asList) merge;
      };

    attrsOf = attrSetOf { name = "attrsOf"; lazy = false; };
    lazyAttrsOf = attrSetOf { name = "lazyAttrsOf"; lazy = true; };
    # lazy: every defined name is kept and its value merged only when used (a name whose
    # definitions are all mkIf false gives the element's empty value, or fails when used)
    attrSetOf =
      { name, lazy }@flavour:
      elemType:
      wrapper (attrSetOf flavour) elemType {
        inherit name;
        description = "${optionalString lazy "lazy "}attribute set of ${phrase [ "noun" "composite" ] elemType}";
        check = isAttrs;
        emptyValue.value = { };
        merge =
          loc: defs:
          let
            perName = builtins.zipAttrsWith (_: ds: ds) (
              map (
                d:
                mapAttrs (_: v: { inherit (d) file; value = v; }) d.value
              ) defs
            );
            merged = mapAttrs (n: ds: resolveDefs (loc ++ [ n ]) elemType ds) perName;
          in
          mapAttrs (_: r: r.value) (if lazy then merged else filterAttrs (_: r: r.defined) merged);
      };

    uniq = elemType: unique { message = ""; } elemType;
    unique =
      { message }:
      elemType:
      wrapper (unique { inherit message; }) elemType {
        name = "unique";
        inherit (elemType) description descriptionClass check;
        merge = loc: defs: if length defs == 1 then elemType.merge loc defs else uniqueOrFail message loc defs;
      };

    functionTo =
      elemType:
      wrapper functionTo elemType {
        name = "functionTo";
        description = "function that evaluates to a(n) ${phrase [ "noun" "composite" ] elemType}";
        check = isFunction;
        merge =
          loc: defs: arg:
          (resolveDefs (loc ++ [ "<function body>" ]) elemType (map (d: d // { value = d.value arg; }) defs))
          .value;
      };

    # Values `from' accepts are converted by `convert' before `to' merges them.
    coercedTo =
      from: convert: to:
      mkOptionType {
        name = "coercedTo";
        description = "${phrase [ "noun" ] to} or ${phrase [ "noun" ] from} convertible to it";
        check = v: to.check v || (from.check v && to.check (convert v));
        merge =
          loc: defs:
          to.merge loc (map (d: d // { value = if from.check d.value then convert d.value else d.value; }) defs);
        emptyValue = to.emptyValue or { };
        subModules = to.subModules;
        withSubModules = mods: coercedTo from convert (to.withSubModules mods);
        combine = _: null;
      };

    addCheck =
      base: extraCheck:
      base
      // {
        check = v: base.check v && extraCheck v;
        combine = _: null;
      };

    # ---- modules as values ----
    submodule =
      modules:
      submoduleWith {
        modules = toList modules;
        shorthandOnlyDefinesConfig = true;
      };
    submoduleWith =
      {
        modules,
        specialArgs ? { },
        shorthandOnlyDefinesConfig ? false,
        description ? null,
        ...
      }@spec:
      let
        # a definition as one more module of the submodule's evaluation
        defAsModule =
          d:
          if shorthandOnlyDefinesConfig && isAttrs d.value then
            {
              _file = d.file;
              config = d.value;
            }
          else
            {
              _file = d.file;
              imports = [ d.value ];
            };
        evalFor =
          loc: defs:
          evalModules {
            modules = modules ++ map defAsModule defs;
            specialArgs = {
              name = if loc == [ ] then "<name>" else last loc;
            }
            // specialArgs;
            prefix = loc;
          };
        freeform = (evalFor [ ] [ ]).freeformType;
      in
      mkOptionType {
        name = "submodule";
        description =
          if description != null then
            description
          else if freeform != null then
            freeform.description
          else
            "submodule";
        check = isModuleLike;
        merge = loc: defs: (evalFor loc defs).config;
        emptyValue.value = { };
        inherit specialArgs shorthandOnlyDefinesConfig;
        subModules = modules;
        withSubModules = mods: submoduleWith (spec // { modules = mods; });
        combine =
          other:
          if (other.kind or null) == "submodule" && other.shorthandOnlyDefinesConfig == shorthandOnlyDefinesConfig then
            submoduleWith (
              spec
              // {
                modules = modules ++ other.subModules;
                specialArgs = specialArgs // other.specialArgs;
              }
            )
          else
            null;
      };

    # The definitions, each imported with its file and option named; not evaluated here.
    deferredModule = simple "deferredModule" "module" isModuleLike (
      loc: defs: {
        imports = map (d: {
          _file = "${toString d.file}, via option ${showOption loc}";
          imports = [ d.value ];
        }) defs;
      }
    ) { };

    optionType = simple "optionType" "optionType" isOptionType (
      loc: defs:
      foldl' (
        acc: d:
        let
          joined = acc.combine d.value;
        in
        if joined == null then
          throw "The option `${showOption loc}' has types that cannot be merged:${showDefs (map (e: e // { value = e.value.description; }) defs)}"
        else
          joined
      ) (head defs).value (tail defs)
    ) { };
  };

  # ===================================================================================
  # Options
  # ===================================================================================

  mkOption = attrs: attrs // { _type = "option"; };
  isOption = v: isAttrs v && (v._type or null) == "option";
  mkEnableOption =
    what:
    mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${what}.";
    };
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };
  literalMD = text: {
    _type = "literalMD";
    inherit text;
  };
  mdDoc = id;

  mkPackageOption =
    pkgs: name:
    {
      nullable ? false,
      default ? name,
      example ? null,
      extraDescription ? "",
      pkgsText ? "pkgs",
    }:
    let
      attrPath = if default == null then null else toList default;
      where = concatStringsSep "." attrPath;
      found =
        if attrPath == null then
          null
        else
          attrByPath attrPath (throw "${where} cannot be found in ${pkgsText}") pkgs;
    in
    mkOption (
      {
        type = if nullable then types.nullOr types.package else types.package;
        description = "The ${name} package to use." + optionalString (extraDescription != "") (" " + extraDescription);
      }
      // optionalAttrs (default != null || nullable) {
        default = found;
        defaultText = literalExpression (if attrPath == null then "null" else "${pkgsText}.${where}");
      }
      // (if example == null then { } else {
        example = literalExpression (if isList example then "${pkgsText}.${concatStringsSep "." example}" else example);
      })
    );

  # The declarations of one option, in the order they are met, as one declaration.
  # At most one may give each of the keys below; types must combine.
  joinDeclarations =
    loc: decls:
    let
      exclusive = [ "default" "defaultText" "example" "description" "apply" ];
      step =
        acc: d:
        let
          spec = d.value;
          known = acc.spec.type or null;
          type =
            if !(spec ? type) then
              known
            else if known == null then
              spec.type
            else
              known.combine spec.type;
          taken = any (k: spec ? ${k} && acc.spec ? ${k}) exclusive;
        in
        if acc.files != [ ] && (taken || (spec ? type && type == null)) then
          throw "The option `${showOption loc}' in `${toString d.file}' is already declared in ${showFiles acc.files}."
        else
          {
            spec = acc.spec // spec // optionalAttrs (type != null) { inherit type; };
            files = acc.files ++ [ d.file ];
            defaultFile = if spec ? default then d.file else acc.defaultFile;
          };
    in
    foldl' step {
      spec = { };
      files = [ ];
      defaultFile = null;
    } decls;

  # One option: `entries` are what the modules declare at its path (mkOption results,
  # or attribute sets of options to nest into a submodule type), `defs` its definitions.
  evalOption =
    loc: entries: defs:
    let
      nested = filter (e: !isOption e.value) entries;
      decl = joinDeclarations loc (filter (e: isOption e.value) entries);
      declaredType = decl.spec.type or types.unspecified;
      type =
        if nested == [ ] then
          declaredType
        else if declaredType.subModules == null then
          throw "The option `${showOption loc}' in module `${concatStringsSep "', `" (map toString decl.files)}' would be a parent of the following options, but its type `${declaredType.description}' does not support nested options.\n${
            concatMapStringsSep "\n" (
              e: concatMapStringsSep "\n" (n: " - option(s) with prefix `${showOption (loc ++ [ n ])}' in module `${toString e.file}'") (attrNames e.value)
            ) nested
          }"
        else
          declaredType.withSubModules (
            declaredType.subModules
            ++ map (e: {
              _file = e.file;
              options = e.value;
            }) nested
          );
      fromDefault = optional (decl.spec ? default) {
        file = decl.defaultFile;
        value = decl.spec.default;
      };
      allDefs = map (d: d // { value = mkOptionDefault d.value; }) fromDefault ++ defs;
      result = resolveDefs loc type allDefs;
      merged =
        if (decl.spec.readOnly or false) && length allDefs > 1 then
          throw "The option `${showOption loc}' is read-only, but it's set multiple times. Definition values:${showDefs (fromDefault ++ defs)}"
        else
          result.value;
    in
    decl.spec
    // {
      _type = "option";
      inherit loc type;
      value = if decl.spec ? apply then decl.spec.apply merged else merged;
      isDefined = result.defined;
      inherit (result) highestPrio;
      files = dedupe (map (d: d.file) result.defs);
      definitions = map (d: d.value) result.defs;
      definitionsWithLocations = result.defs;
      declarations = decl.files ++ map (e: e.file) nested;
      __toString = option: showOption option.loc;
    };

  # ===================================================================================
  # Modules
  # ===================================================================================

  # Attributes a module may have besides `options` and `config` (the rest of a module
  # without `options`/`config` is its config).
  moduleKeys = [ "_file" "key" "imports" "require" "disabledModules" "freeformType" "meta" "_class" ];

  # A module as the module list holds it (path, function or attribute set), as
  # { key; file; options; config; imports; disabled; freeform; }.
  loadModule =
    call: file: key: raw:
    if isPath raw || isString raw then
      loadModule call (toString raw) (toString raw) (import raw)
    else if isFunction raw then
      loadModule call file key (call file raw)
    else if !isAttrs raw then
      throw "A module must be a path, a function or an attribute set, not a ${typeOf raw} (in `${file}')."
    else
      let
        explicit = raw ? config || raw ? options;
        stray = attrNames (removeAttrs raw (moduleKeys ++ [ "config" "options" ]));
      in
      if explicit && stray != [ ] then
        throw "Module `${toString (raw._file or key)}' has an unsupported attribute `${head stray}'. Once a module has `config' or `options', every definition belongs in `config' (here: ${concatStringsSep ", " stray})."
      else
        {
          # (a store path's context cannot go into the attribute names keys are kept in)
          key = builtins.unsafeDiscardStringContext (toString (raw.key or key));
          file = toString (raw._file or file);
          options = raw.options or { };
          config = if explicit then raw.config or { } else removeAttrs raw moduleKeys;
          imports = (raw.imports or [ ]) ++ (raw.require or [ ]);
          disabled = raw.disabledModules or [ ];
          freeform = raw.freeformType or null;
        };

  # The module tree (each module with its imports as children), then the modules in
  # depth-first order: each key once, disabled modules left out with what they import.
  collectModules =
    call: core: roots:
    let
      grow =
        file: parentKey: i: raw:
        let
          m = loadModule call file "${parentKey}:anon-${toString i}" raw;
        in
        m // { children = imap1 (grow m.file m.key) m.imports; };
      trees = [ (grow "<unknown-file>" "" 0 core) ] ++ imap1 (grow "<unknown-file>" "") roots;
      walk =
        skip: acc: node:
        if acc.seen ? ${node.key} || elem node.key skip then
          acc
        else
          foldl' (walk skip) {
            seen = acc.seen // { ${node.key} = true; };
            found = acc.found ++ [ node ];
          } node.children;
      walkAll =
        skip:
        (foldl' (walk skip) {
          seen = { };
          found = [ ];
        } trees).found;
      disabledKey =
        d:
        if isAttrs d && d ? key then
          builtins.unsafeDiscardStringContext (toString d.key)
        else if isPath d || isString d then
          builtins.unsafeDiscardStringContext (toString d)
        else
          throw "disabledModules: cannot disable ${typeOf d} values; give a path or { key = ...; }.";
      skipped = map disabledKey (concatMap (m: m.disabled) (walkAll [ ]));
    in
    walkAll skipped;

  # One level of the option tree at `loc` (`rel`: the same path below the evaluation's
  # prefix). decls: [ { file; tree; } ] the options the modules declare here, defs:
  # [ { file; value; } ] their definitions here. Every declared name becomes an option or
  # a nested level; defined names nobody declares are `unmatched`.
  mergeLevel =
    loc: rel: decls: defs:
    let
      groupBy' =
        field: entries:
        builtins.zipAttrsWith (_: xs: xs) (
          map (
            e:
            mapAttrs (_: v: { inherit (e) file; value = v; }) e.${field}
          ) entries
        );
      spread = concatMap (
        d:
        map (v: { inherit (d) file; value = v; }) (spreadProps loc d.file d.value)
      ) defs;
      declared = groupBy' "tree" decls;
      defined = groupBy' "value" spread;
      asTree =
        at: e:
        if isAttrs e.value && !(e.value ? _type) then
          e.value
        else
          throw "In module ${toString e.file}: expected an option declaration at option path `${showOption at}` but got ${
            if isAttrs e.value then "an attribute set with type ${toString e.value._type}" else "a ${typeOf e.value}"
          }";
      node =
        name: entries:
        let
          at = loc ++ [ name ];
          here = defined.${name} or [ ];
        in
        if any (e: isOption e.value) entries then
          {
            leaf = true;
            option = evalOption at entries here;
          }
        else
          {
            leaf = false;
            level = mergeLevel at (rel ++ [ name ]) (map (e: {
              inherit (e) file;
              tree = asTree at e;
            }) entries) here;
          };
      nodes = mapAttrs node declared;
      strays = concatMap (
        n:
        map (d: d // {
          loc = loc ++ [ n ];
          rel = rel ++ [ n ];
        }) defined.${n}
      ) (filter (n: !(declared ? ${n})) (attrNames defined));
    in
    {
      inherit nodes;
      options = mapAttrs (_: n: if n.leaf then n.option else n.level.options) nodes;
      config = mapAttrs (_: n: if n.leaf then n.option.value else n.level.config) nodes;
      unmatched = strays ++ concatMap (n: if n.leaf then [ ] else n.level.unmatched) (builtins.attrValues nodes);
    };

  # The declared configuration with freeform values added where nothing is declared.
  addFreeform =
    level: free:
    removeAttrs free (attrNames level.nodes)
    // mapAttrs (n: nd: if nd.leaf then nd.option.value else addFreeform nd.level (free.${n} or { })) level.nodes;

  # Declared by every evaluation.
  coreModule = {
    _file = "<module system>";
    key = "<module system>";
    options._module.args = mkOption {
      type = with types; lazyAttrsOf raw;
      internal = true;
      description = "Arguments given to every module function, besides the special ones.";
    };
  };

  evalModules =
    {
      modules ? [ ],
      specialArgs ? { },
      prefix ? [ ],
      ...
    }@request:
    let
      given = {
        inherit config options specialArgs;
        lib = self;
      }
      // specialArgs;
      # a module function's named arguments: special ones, else config._module.args
      call =
        file: f:
        f (
          mapAttrs (
            n: _:
            given.${n} or config._module.args.${n} or (throw "The module `${file}' takes the argument `${n}', which is neither a special argument nor set in _module.args.")
          ) (functionArgs f)
          // given
        );
      # nixpkgs' order: definitions and declarations in reverse module order
      backwards = reverseList (collectModules call coreModule modules);
      root = mergeLevel prefix [ ] (map (m: {
        inherit (m) file;
        tree = m.options;
      }) backwards) (map (m: {
        inherit (m) file;
        value = m.config;
      }) backwards);
      freeformTypes = filter (t: t != null) (map (m: m.freeform) backwards);
      freeformType =
        if freeformTypes == [ ] then
          null
        else
          foldl' (
            acc: t:
            let
              joined = acc.combine t;
            in
            if joined == null then throw "The freeformType of `${showOption prefix}' is given twice, with types that cannot be merged." else joined
          ) (head freeformTypes) (tail freeformTypes);
      config =
        if freeformType == null || root.unmatched == [ ] then
          root.config
        else
          addFreeform root (
            resolveDefs prefix freeformType (
              map (u: {
                inherit (u) file;
                value = setAttrByPath u.rel u.value;
              }) root.unmatched
            )
          ).value;
      options = root.options;
      unknownOptions =
        if freeformType != null || root.unmatched == [ ] then
          true
        else
          let
            first = head root.unmatched;
            hint =
              if attrNames options != [ "_module" ] then
                ""
              else if prefix == [ ] then
                "\n\nIt seems as if you're trying to declare an option by placing it into `config' rather than `options'!"
              else
                "\n\nHowever there are no options defined in `${showOption prefix}'. Are you sure you've declared them under `options' (e.g. in the modules of types.submodule) and not under `config'?";
          in
          throw "The option `${showOption first.loc}' does not exist. Definition values:${showDefs [ first ]}${hint}";
    in
    {
      config = builtins.seq unknownOptions (removeAttrs config [ "_module" ]);
      inherit options freeformType;
      extendModules =
        {
          modules ? [ ],
          specialArgs ? { },
          prefix ? request.prefix or [ ],
        }:
        evalModules (
          request
          // {
            modules = (request.modules or [ ]) ++ modules;
            specialArgs = (request.specialArgs or { }) // specialArgs;
            inherit prefix;
          }
        );
    };

  # ===================================================================================
  # The library
  # ===================================================================================

  self = {
    inherit (builtins) add all any attrNames attrValues catAttrs concatLists concatMap
      concatStringsSep deepSeq elem elemAt filter foldl' fromJSON functionArgs genList
      getAttr groupBy hasAttr head intersectAttrs isAttrs isBool isFloat isFunction isInt
      isList isPath isString length listToAttrs mapAttrs match pathExists readFile
      removeAttrs replaceStrings seq sort split stringLength substring tail toJSON trace
      tryEval typeOf zipAttrsWith;
    # modules and options
    inherit evalModules mkOption mkEnableOption mkPackageOption mkOptionType isOption
      isOptionType types mkIf mkMerge mkOverride mkOptionDefault mkDefault
      mkImageMediaOverride mkForce mkVMOverride mkOrder mkBefore mkAfter mergeEqualOption
      mergeOneOption mergeDefaultOption literalExpression literalMD mdDoc showOption
      showFiles;
    defaultOverridePriority = plainPriority;
    defaultOrderPriority = plainOrder;
    # lists
    inherit toList optional optionals imap0 imap1 flatten reverseList take drop last init
      count findFirst foldr range subtractLists intersectLists mutuallyExclusive naturalSort;
    unique = dedupe;
    fold = foldr;
    foldl = foldl';
    # strings
    inherit concatStrings concatMapStrings concatMapStringsSep concatLines optionalString
      hasPrefix hasSuffix hasInfix removePrefix removeSuffix toUpper toLower escape
      splitString toInt escapeShellArg escapeShellArgs versionAtLeast versionOlder versions;
    trim = trimSpace;
    # attribute sets
    inherit nameValuePair mapAttrsToList mapAttrs' filterAttrs genAttrs optionalAttrs
      attrByPath hasAttrByPath getAttrFromPath setAttrByPath recursiveUpdate;
    zipAttrs = builtins.zipAttrsWith (_: vs: vs);
    # values, derivations
    inherit id const flip min max boolToString throwIf throwIfNot assertMsg warn
      isDerivation isStringLike isStorePath getOutput getName getExe getExe' makeSearchPath
      makeSearchPathOutput makeBinPath kernel generators;
    getBin = getOutput "bin";
    getLib = getOutput "lib";
    getDev = getOutput "dev";
    getMan = getOutput "man";
  };
in
self
